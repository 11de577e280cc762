// The official openai npm client against a running `diffmoe serve` (run by tests/serve/test_http.cpp):
// models, completions and chat, each plain and streamed (the streamed text must equal the plain one),
// echo + logprobs as lm-evaluation-harness asks for them, and an error the client must surface as an
// APIError with the server's status and parameter.
// usage: DIFFMOE_OPENAI_CLIENT_DIR=tools/openai-client node openai_client.mjs BASE_URL MODEL
import { createRequire } from 'node:module';
import assert from 'node:assert/strict';

const [baseURL, model] = process.argv.slice(2);
const require = createRequire(`${process.env.DIFFMOE_OPENAI_CLIENT_DIR}/package.json`);
const { OpenAI, APIError } = require('openai');
const client = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0, timeout: 60000 });

const models = await client.models.list();
assert.ok(models.data.some((m) => m.id === model), `model ${model} listed`);

const prompt = 'the captain walked to the sea';
const plain = await client.completions.create({ model, prompt, max_tokens: 12, temperature: 0 });
assert.equal(plain.object, 'text_completion');
assert.equal(plain.choices.length, 1);
assert.equal(plain.usage.completion_tokens + plain.usage.prompt_tokens, plain.usage.total_tokens);
let streamed = '';
let finish = null;
for await (const chunk of await client.completions.create({ model, prompt, max_tokens: 12, temperature: 0, stream: true })) {
  for (const c of chunk.choices) {
    streamed += c.text;
    if (c.finish_reason) finish = c.finish_reason;
  }
}
assert.equal(streamed, plain.choices[0].text, 'streamed completion equals the plain one');
assert.equal(finish, plain.choices[0].finish_reason);

const messages = [{ role: 'system', content: 'You are terse.' }, { role: 'user', content: 'Tell me about the whale.' }];
const chat = await client.chat.completions.create({ model, messages, max_tokens: 10, temperature: 0 });
assert.equal(chat.object, 'chat.completion');
assert.equal(chat.choices[0].message.role, 'assistant');
let chatText = '';
let usage = null;
for await (const chunk of await client.chat.completions.create({
  model, messages, max_tokens: 10, temperature: 0, stream: true, stream_options: { include_usage: true },
})) {
  for (const c of chunk.choices) chatText += c.delta.content ?? '';
  if (chunk.usage) usage = chunk.usage;
}
assert.equal(chatText, chat.choices[0].message.content, 'streamed chat equals the plain one');
assert.deepEqual(usage, chat.usage, 'the stream reports the same usage');

const scored = await client.completions.create({ model, prompt, max_tokens: 1, temperature: 0, echo: true, logprobs: 1 });
const lp = scored.choices[0].logprobs;
assert.equal(lp.token_logprobs[0], null, 'the first prompt token has no logprob');
// The prompt's tokens, then the generated one (none when it was the end-of-text token).
assert.ok(lp.tokens.length >= scored.usage.prompt_tokens && lp.tokens.length <= scored.usage.prompt_tokens + 1);
assert.ok(lp.token_logprobs.slice(1).every((x) => typeof x === 'number' && x <= 0));
assert.ok(scored.choices[0].text.startsWith(prompt), 'echo returns the prompt first');

await assert.rejects(client.completions.create({ model, prompt, max_tokens: 1000000 }), (e) => {
  assert.ok(e instanceof APIError);
  assert.equal(e.status, 400);
  assert.equal(e.param, 'max_tokens');
  return true;
});
console.log(JSON.stringify({ ok: true, completion: plain.choices[0].text, chat: chat.choices[0].message.content }));

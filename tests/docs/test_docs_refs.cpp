// Every section citation in the repository names a section that exists in docs/.
//
// Citations look like "docs/model.md §5", "docs/derivations.md §4.4", "docs/derivations.md App. A",
// "docs/formats.md §1b", also as lists and ranges ("§1.3-1.4, §2.5", "§1-§9", "§5/§6"). The short
// forms "spec §N" (= docs/model.md), "sources §N.M" / "sources App. A" (= docs/derivations.md) and
// "formats.md §N" (= docs/formats.md) are checked the same way. A bare "§N" without a document name
// is left alone: which document it means depends on the comment around it.
// A section exists when a Markdown heading of its document starts with its number ("## 5. MoE",
// "### 1b. safetensors") or names the appendix ("## Appendix A. ...").
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

const std::string kSection = "\xC2\xA7";  // "§" in UTF-8; kept out of literal citations below

// The documents citations may point to, by file name under docs/.
enum class Doc { kModel, kDerivations, kFormats };

std::string doc_file(Doc d) {
  switch (d) {
    case Doc::kModel: return "model.md";
    case Doc::kDerivations: return "derivations.md";
    case Doc::kFormats: return "formats.md";
  }
  return "";
}

// The document a citation prefix names (case-insensitive), e.g. "spec" -> model.md.
Doc doc_of_prefix(std::string p) {
  for (char& c : p) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (p.starts_with("docs/")) p = p.substr(5);
  if (p == "model.md" || p == "spec") return Doc::kModel;
  if (p == "formats.md") return Doc::kFormats;
  return Doc::kDerivations;  // derivations.md, derivations, sources.md, sources
}

using Sections = std::map<Doc, std::set<std::string>>;

// Section ids of one Markdown document: "5", "1b", "4.6", "App. A". Headings inside ``` fences
// (shell comments in examples) are not headings.
std::set<std::string> parse_sections(const std::string& markdown) {
  static const std::regex kNumbered(R"(^#+\s+([0-9]+[a-z]?(?:\.[0-9]+)*)\.?(?:\s|$))");
  static const std::regex kAppendix(R"(^#+\s+Appendix\s+([A-Z])\b)");
  std::set<std::string> ids;
  std::istringstream in(markdown);
  bool fenced = false;
  for (std::string line; std::getline(in, line);) {
    if (line.starts_with("```")) fenced = !fenced;
    if (fenced || !line.starts_with("#")) continue;
    std::smatch m;
    if (std::regex_search(line, m, kNumbered)) ids.insert(m[1]);
    if (std::regex_search(line, m, kAppendix)) ids.insert("App. " + m[1].str());
  }
  return ids;
}

struct Citation {
  Doc doc;
  std::string id;  // "5", "4.6", "App. A"
  int line = 0;
};

// One cited item as written: "§ 4.4", "App. A", "Appendix A" -> its id.
std::string item_id(const std::string& text) {
  static const std::regex kApp(R"((?:App\.|Appendix)\s*([A-Z]))");
  std::smatch m;
  if (std::regex_search(text, m, kApp)) return "App. " + m[1].str();
  std::string id = text.substr(text.find(kSection) + kSection.size());
  id.erase(0, id.find_first_not_of(" "));
  return id;
}

// Every citation in `text` with its 1-based line number.
std::vector<Citation> find_citations(const std::string& text) {
  const std::string id = "[0-9]+[a-z]?(?:\\.[0-9]+)*";
  const std::string item = "(?:" + kSection + " ?" + id + "|App\\. ?[A-Z]|Appendix [A-Z])";
  // A document name at a word start, then one item.
  static const std::regex kFirst(
      "(?:^|[^A-Za-z0-9_.-])((?:docs/)?(?:model|derivations|formats|sources)\\.md|"
      "[Dd]erivations|[Ss]pec|[Ss]ources):? ?(" +
      item + ")");
  // Further items of the same list: ", §x", "; §x", "/§x", " and §x", or a range "-x" / "–§x".
  static const std::regex kMore("^(?:\\s*(?:,|;|/|&|and|or)\\s*(" + item + ")|\\s*(?:-|\xE2\x80\x93)\\s*(" + item +
                                "|" + id + "))");
  std::vector<Citation> out;
  std::istringstream in(text);
  int line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.find(kSection) == std::string::npos && line.find("App") == std::string::npos) continue;
    for (auto it = std::sregex_iterator(line.begin(), line.end(), kFirst); it != std::sregex_iterator(); ++it) {
      const Doc doc = doc_of_prefix((*it)[1]);
      out.push_back({doc, item_id((*it)[2]), line_no});
      // Follow the list from the end of this item.
      auto rest_begin = line.cbegin() + (*it).position(0) + (*it).length(0);
      std::smatch more;
      while (std::regex_search(rest_begin, line.cend(), more, kMore)) {
        const std::string next = more[1].matched ? more[1].str() : more[2].str();
        out.push_back(
            {doc,
             next.find(kSection) != std::string::npos || next.find("App") != std::string::npos ? item_id(next) : next,
             line_no});
        rest_begin = more[0].second;
      }
    }
  }
  return out;
}

// "file:line: cites docs/model.md §N, which has no such section" for each citation of `text`
// (named `name`) that `sections` lacks.
std::vector<std::string> bad_citations(const std::string& name, const std::string& text, const Sections& sections,
                                       int* checked = nullptr) {
  std::vector<std::string> bad;
  for (const Citation& c : find_citations(text)) {
    if (checked) ++*checked;
    const auto& ids = sections.at(c.doc);
    if (ids.contains(c.id)) continue;
    const std::string shown = c.id.starts_with("App.") ? c.id : kSection + c.id;
    bad.push_back(name + ":" + std::to_string(c.line) + ": cites docs/" + doc_file(c.doc) + " " + shown +
                  ", which has no such section");
  }
  return bad;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Sections repo_sections() {
  Sections s;
  for (Doc d : {Doc::kModel, Doc::kDerivations, Doc::kFormats})
    s[d] = parse_sections(read_file(fs::path(DIFFMOE_REPO_DIR) / "docs" / doc_file(d)));
  return s;
}

// ---- the checker on fixtures: it finds what is there and only that ----

TEST(DocsRefs, HeadingsGiveSectionIds) {
  const std::set<std::string> ids = parse_sections(
      "# Title\n## 1. One\n### 1a. Sub\n### 1.4 Backward\n## 12. Last\n```\n# 7. a shell comment\n```\n"
      "## Appendix A. RMSNorm\n#### not a number\n");
  EXPECT_EQ(ids, (std::set<std::string>{"1", "1a", "1.4", "12", "App. A"}));
}

TEST(DocsRefs, FindsEveryFormOfCitation) {
  const std::string s = kSection;
  const std::string text = "// spec " + s + "5 and Spec " + s +
                           "6's rule\n"
                           "x  // sources " +
                           s + "1.3-1.4, " + s + "2.5/" + s +
                           "3.2 and sources App. A\n"
                           "(model.md " +
                           s + "1-" + s + "9, sources.md " + s +
                           "4.6, Appendix B)\n"
                           "docs/derivations.md " +
                           s + "4.4; docs/formats.md " + s + "1c. formats.md " + s +
                           "4.6\n"
                           "no citation: respec " +
                           s + "3, a bare " + s + "7, shared/spec/model.md\n";
  std::vector<std::string> got;
  for (const Citation& c : find_citations(text))
    got.push_back(doc_file(c.doc) + " " + c.id + " @" + std::to_string(c.line));
  const std::vector<std::string> want = {
      "model.md 5 @1",         "model.md 6 @1",         "derivations.md 1.3 @2",    "derivations.md 1.4 @2",
      "derivations.md 2.5 @2", "derivations.md 3.2 @2", "derivations.md App. A @2", "model.md 1 @3",
      "model.md 9 @3",         "derivations.md 4.6 @3", "derivations.md App. B @3", "derivations.md 4.4 @4",
      "formats.md 1c @4",      "formats.md 4.6 @4"};
  EXPECT_EQ(got, want);
}

// The negative test: a citation of a missing section fails, naming file and line.
TEST(DocsRefs, ReportsMissingSectionsWithFileAndLine) {
  const Sections sections = {
      {Doc::kModel, {"1", "5"}}, {Doc::kDerivations, {"1.4", "App. A"}}, {Doc::kFormats, {"1b"}}};
  const std::string s = kSection;
  const std::string app_c = std::string("App") + ". C";  // split so that this file does not cite it
  const std::string text = "ok: spec " + s + "5, sources " + s + "1.4, sources App. A, formats.md " + s +
                           "1b\n"
                           "bad: docs/model.md " +
                           s +
                           "13\n"
                           "bad: sources " +
                           s + "1.4-1.9 and sources " + app_c +
                           "\n"
                           "bad: formats.md " +
                           s + "2.1\n";
  const std::vector<std::string> want = {"f.cpp:2: cites docs/model.md " + s + "13, which has no such section",
                                         "f.cpp:3: cites docs/derivations.md " + s + "1.9, which has no such section",
                                         "f.cpp:3: cites docs/derivations.md " + app_c + ", which has no such section",
                                         "f.cpp:4: cites docs/formats.md " + s + "2.1, which has no such section"};
  EXPECT_EQ(bad_citations("f.cpp", text, sections), want);
}

// ---- the repository ----

TEST(DocsRefs, DocsHaveTheirSections) {
  const Sections s = repo_sections();
  for (int i = 1; i <= 12; ++i) EXPECT_TRUE(s.at(Doc::kModel).contains(std::to_string(i))) << "docs/model.md " << i;
  for (const char* id : {"1.4", "2.5", "3.2", "4.4", "4.6", "5.1", "6.5", "App. A"})
    EXPECT_TRUE(s.at(Doc::kDerivations).contains(id)) << "docs/derivations.md " << id;
  for (const char* id : {"1a", "1b", "1c", "3.1", "3.3", "4.6"})
    EXPECT_TRUE(s.at(Doc::kFormats).contains(id)) << "docs/formats.md " << id;
}

TEST(DocsRefs, EveryCitationInTheRepositoryExists) {
  const Sections sections = repo_sections();
  const fs::path repo(DIFFMOE_REPO_DIR);
  std::vector<std::string> bad;
  int checked = 0, files = 0;
  std::vector<fs::path> roots = {"src", "tests", "tools", "bench", "docs", "configs"};
  for (const fs::path& root : roots) {
    for (auto it = fs::recursive_directory_iterator(repo / root); it != fs::recursive_directory_iterator(); ++it) {
      if (it->is_directory() && it->path().filename() == "node_modules") {
        it.disable_recursion_pending();
        continue;
      }
      if (!it->is_regular_file()) continue;
      const std::string text = read_file(it->path());
      if (text.find('\0') != std::string::npos) continue;  // binary (fixtures)
      ++files;
      const auto found = bad_citations(fs::relative(it->path(), repo).string(), text, sections, &checked);
      bad.insert(bad.end(), found.begin(), found.end());
    }
  }
  for (const char* top : {"README.md", "CMakeLists.txt"}) {
    const auto found = bad_citations(top, read_file(repo / top), sections, &checked);
    bad.insert(bad.end(), found.begin(), found.end());
  }
  std::string report;
  for (const auto& b : bad) report += b + "\n";
  EXPECT_TRUE(bad.empty()) << bad.size() << " citation(s) of missing sections:\n" << report;
  // The code cites the docs a few hundred times: far fewer found means the scanner broke.
  EXPECT_GT(checked, 200) << "only " << checked << " citations found in " << files << " files";
  std::cout << checked << " citations in " << files << " files checked\n";
}

}  // namespace

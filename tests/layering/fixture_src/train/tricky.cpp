// Lines CMake lists treat specially before the planted include, so its line number must survive them;
// the commented-out and string includes below must not be reported. a[i]; b\c
int a[3] = {1, 2, 3};
#define TWO_LINES(x) \
  (x);

const char* s = "#include \"serve/engine.h\"";
// #include "serve/engine.h"
  #  include "serve/engine.h"

// planted: a quoted include that names no file
#include "io/does_not_exist.h"

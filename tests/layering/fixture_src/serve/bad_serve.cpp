// planted: serve includes dist
#include "dist/comm.h"
#include "serve/engine.h"

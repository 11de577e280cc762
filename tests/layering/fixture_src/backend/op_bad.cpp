// planted: the interface includes a concrete backend
#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"

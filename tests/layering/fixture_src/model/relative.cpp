// planted: a relative path into backend/cuda, and an angle-bracket project include
#include "../backend/cuda/kernel.cuh"
#include <backend/cpu/cpu_backend.h>

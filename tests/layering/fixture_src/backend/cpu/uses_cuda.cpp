// planted: the CPU backend includes the CUDA backend
#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"

#include "backend/backend_registry.h"

#include "backend/cpu/cpu_backend.h"
#ifdef HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

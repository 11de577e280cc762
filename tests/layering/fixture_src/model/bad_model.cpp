// planted: the model includes a concrete backend, the registry and a CUDA header
#include <cuda_runtime.h>

#include "backend/backend_registry.h"
#include "backend/cpu/cpu_backend.h"
#include "model/model.h"

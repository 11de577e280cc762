#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "backend/backend.h"
#include "kernel.cuh"

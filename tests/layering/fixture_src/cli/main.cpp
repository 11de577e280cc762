#include "backend/cuda/cuda_backend.h"
#include "serve/engine.h"
#include "train/trainer.h"

// planted: train includes cuBLAS and the serving layer above it
#include <cublas_v2.h>
#include "serve/engine.h"
#include "train/trainer.h"

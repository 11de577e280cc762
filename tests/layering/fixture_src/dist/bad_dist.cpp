// planted: dist includes the model, and NCCL outside an nccl_* file
#include <nccl.h>

#include "dist/comm.h"
#include "model/model.h"

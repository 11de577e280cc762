#include <nccl.h>

#include "dist/comm.h"

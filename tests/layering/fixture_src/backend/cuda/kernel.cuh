#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cub/block/block_reduce.cuh>

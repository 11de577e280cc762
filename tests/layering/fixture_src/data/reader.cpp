#include "core/tensor.h"

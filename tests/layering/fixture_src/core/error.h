#pragma once
#include <string>

#include "core/tensor.h"

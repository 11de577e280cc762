#pragma once
#include "backend/backend.h"
#include "core/tensor.h"

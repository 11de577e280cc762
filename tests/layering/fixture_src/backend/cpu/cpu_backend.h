#pragma once
#include "backend/backend.h"
#include "core/error.h"

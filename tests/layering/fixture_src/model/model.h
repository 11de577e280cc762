#pragma once
#include "backend/backend.h"
#include "io/config.h"

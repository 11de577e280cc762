#pragma once
#include "backend/backend_registry.h"
#include "dist/comm.h"
#include "model/model.h"

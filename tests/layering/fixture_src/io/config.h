#pragma once
#include "core/error.h"

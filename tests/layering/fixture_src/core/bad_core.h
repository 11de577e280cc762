// planted: core includes the model
#pragma once
#include "model/model.h"

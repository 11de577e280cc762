#pragma once
#include "model/model.h"
#include "train/trainer.h"

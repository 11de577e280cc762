// planted: data includes the model (above it)
#include "model/model.h"

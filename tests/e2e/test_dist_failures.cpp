#include "dist_util.h"

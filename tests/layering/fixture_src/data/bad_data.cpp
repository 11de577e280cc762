// planted: data includes io (both sit beside each other on core)
#include "io/config.h"

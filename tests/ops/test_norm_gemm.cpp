// SCAFFOLD: tests are added here.
#include <gtest/gtest.h>

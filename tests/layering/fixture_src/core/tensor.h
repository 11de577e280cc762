// fixture: a core header (std only)
#pragma once
#include <vector>

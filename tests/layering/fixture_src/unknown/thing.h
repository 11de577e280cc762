// planted: a folder that is in no layer
#pragma once

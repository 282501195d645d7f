#pragma once
#include "numeric/bf16.hpp"
#include "numeric/convert.hpp"
#include "numeric/half.hpp"
#include "numeric/traits.hpp"

#pragma once
#include "numeric/accumulate.hpp"
#include "numeric/bf16.hpp"
#include "numeric/convert.hpp"
#include "numeric/half.hpp"
#include "numeric/traits.hpp"

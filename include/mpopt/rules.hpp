#pragma once
#include "rule/adagrad.hpp"
#include "rule/adam.hpp"
#include "rule/lamb.hpp"
#include "rule/lion.hpp"
#include "rule/sgd.hpp"

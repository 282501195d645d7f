// Status codes inside the library, exceptions at its edge.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

namespace mpopt {

enum class errc {
  ok = 0,
  invalid_argument,  // a hyper-parameter, size or pointer the caller passed is wrong
  scale_at_minimum,  // dynamic loss scale would go below its minimum (error_at_min is on)
  unsupported,       // a valid request this build or backend cannot carry out
};

// The result of an operation that may fail; `message` names the argument and the value.
struct status {
  errc code = errc::ok;
  std::string message;

  static status success() { return {}; }
  static status invalid(std::string msg) { return {errc::invalid_argument, std::move(msg)}; }
  bool ok() const noexcept { return code == errc::ok; }
  explicit operator bool() const noexcept { return ok(); }
};

// Thrown at the API edge (constructors, setters) for bad input; nothing has been changed when it is thrown.
class error : public std::invalid_argument {
 public:
  explicit error(const status& s) : std::invalid_argument(s.message), code_(s.code) {}
  errc code() const noexcept { return code_; }

 private:
  errc code_;
};

inline void throw_if_error(const status& s) {
  if (!s.ok()) throw error(s);
}

}  // namespace mpopt

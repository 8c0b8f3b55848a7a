// SPDX-License-Identifier: Apache-2.0
/// \file error.h
/// \brief tidal's exception hierarchy (mapped to Python exception types) and the check macros.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace tidal {

/// Base of every error tidal throws across a component boundary (Python: RuntimeError).
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
/// A bad argument from the caller (Python: ValueError).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};
/// A file that does not exist (Python: FileNotFoundError).
class FileNotFound : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};
/// A malformed, truncated or inconsistent checkpoint or config (Python: tidal.FormatError, a
/// ValueError).
class FormatError : public Error {
 public:
  using Error::Error;
};
/// Something tidal does not support: model type, dtype, device (Python: NotImplementedError).
class Unsupported : public Error {
 public:
  using Error::Error;
};
/// An impossible memory budget (Python: MemoryError).
class OutOfMemory : public Error {
 public:
  using Error::Error;
};
/// A broken invariant inside tidal: a bug (Python: RuntimeError).
class InternalError : public Error {
 public:
  using Error::Error;
};

}  // namespace tidal

/// Throws `type` with a fmt-formatted message when `cond` is false (bad input).
#define TIDAL_CHECK(cond, type, ...)                   \
  do {                                                 \
    if (!(cond)) throw type(fmt::format(__VA_ARGS__)); \
  } while (0)

/// Throws InternalError when an invariant does not hold.
#define TIDAL_ASSERT(cond, ...)                                                                \
  do {                                                                                         \
    if (!(cond))                                                                               \
      throw ::tidal::InternalError(fmt::format("internal error at {}:{}: {} (please report)",  \
                                               __FILE__, __LINE__, fmt::format(__VA_ARGS__))); \
  } while (0)

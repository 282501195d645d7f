// safetensors files (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes
// of JSON {"name": {"dtype", "shape", "data_offsets": [begin, end]}, ..., "__metadata__": {string: string}}
// (padded with spaces to a multiple of 8), then the tensors' raw little-endian bytes, back to back, offsets relative
// to the end of the header. Any safetensors reader (Python, Rust, C++) reads what write_file writes.
//
// Also here: crash-safe file writes (temporary name, fsync, rename, fsync of the directory) and CRC-32 (zlib's
// polynomial, so Python's zlib.crc32 checks a file). POSIX only (open, pread, fsync, rename).
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "../numeric/traits.hpp"
#include "json.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mpopt checkpoints write raw little-endian tensor bytes: a big-endian host is not supported"
#endif

namespace mpopt::checkpoint {

// ---------------------------------------------------------------------------------------------------------------
// dtypes: safetensors names <-> mpopt::dtype.

inline const char* safetensors_dtype(dtype d) {
  switch (d) {
    case dtype::fp32: return "F32";
    case dtype::fp16: return "F16";
    case dtype::bf16: return "BF16";
    case dtype::fp64: return "F64";
  }
  return "?";
}

// Element size of a safetensors dtype name, 0 when unknown. The integer and bool types are accepted so extra
// tensors of those types (RNG state, counters) fit the format.
inline std::size_t safetensors_dtype_size(const std::string& s) {
  static const std::pair<const char*, std::size_t> known[] = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
      {"I8", 1},  {"U64", 8}, {"U32", 4}, {"U16", 2},  {"U8", 1},  {"BOOL", 1}};
  for (const auto& k : known)
    if (s == k.first) return k.second;
  return 0;
}

inline bool parse_dtype(const std::string& s, dtype& out) {
  for (dtype d : {dtype::fp32, dtype::fp16, dtype::bf16, dtype::fp64})
    if (s == safetensors_dtype(d) || s == dtype_name(d)) {
      out = d;
      return true;
    }
  return false;
}

// ---------------------------------------------------------------------------------------------------------------
// CRC-32 (IEEE 802.3, reflected, as zlib and Python's zlib.crc32).

class crc32 {
 public:
  void update(const void* data, std::size_t n) noexcept {
    static const table t;
    const auto* p = static_cast<const unsigned char*>(data);
    std::uint32_t c = ~crc_;
    for (std::size_t i = 0; i < n; ++i) c = t.v[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
    crc_ = ~c;
  }
  std::uint32_t value() const noexcept { return crc_; }

 private:
  struct table {
    std::uint32_t v[256];
    table() {
      for (std::uint32_t i = 0; i < 256; ++i) {
        std::uint32_t c = i;
        for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        v[i] = c;
      }
    }
  };
  std::uint32_t crc_ = 0;
};

inline std::string hex32(std::uint32_t v) {
  char buf[9];
  std::snprintf(buf, sizeof buf, "%08x", unsigned(v));
  return buf;
}

// ---------------------------------------------------------------------------------------------------------------
// Files.

namespace detail {

inline status io_error(const std::string& what, const std::string& path) {
  return status::invalid(what + " " + path + ": " + std::strerror(errno));
}

inline std::string parent_dir(const std::string& path) {
  const std::size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Makes a rename or unlink in `dir` durable.
inline status fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return io_error("cannot open directory", dir);
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return io_error("cannot fsync directory", dir);
  return status::success();
}

}  // namespace detail

// A file written under `path + ".tmp"` and renamed to `path` by commit(), after fsync: readers see the old file or
// the complete new one, never a partial one. The destructor removes an uncommitted temporary. Counts the bytes and
// their CRC-32.
class atomic_file {
 public:
  atomic_file() = default;
  atomic_file(const atomic_file&) = delete;
  atomic_file& operator=(const atomic_file&) = delete;
  ~atomic_file() {
    if (fd_ >= 0) {
      ::close(fd_);
      ::unlink(tmp_.c_str());
    }
  }

  status open(const std::string& path) {
    path_ = path;
    tmp_ = path + ".tmp";
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) return detail::io_error("cannot create", tmp_);
    return status::success();
  }

  status write(const void* data, std::size_t n) {
    const auto* p = static_cast<const char*>(data);
    crc_.update(p, n);
    bytes_ += n;
    while (n > 0) {
      const ::ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return detail::io_error("cannot write", tmp_);
      p += w;
      n -= std::size_t(w);
    }
    return status::success();
  }

  status commit() {
    if (::fsync(fd_) != 0) return detail::io_error("cannot fsync", tmp_);
    const int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) {
      ::unlink(tmp_.c_str());
      return detail::io_error("cannot close", tmp_);
    }
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
      const status st = detail::io_error("cannot rename " + tmp_ + " to", path_);
      ::unlink(tmp_.c_str());
      return st;
    }
    return detail::fsync_dir(detail::parent_dir(path_));
  }

  std::uint64_t bytes() const noexcept { return bytes_; }
  std::uint32_t crc() const noexcept { return crc_.value(); }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  std::uint64_t bytes_ = 0;
  crc32 crc_;
};

// A read-only file, read at offsets.
class input_file {
 public:
  input_file() = default;
  input_file(const input_file&) = delete;
  input_file& operator=(const input_file&) = delete;
  input_file(input_file&& o) noexcept : path_(std::move(o.path_)), fd_(o.fd_), size_(o.size_) { o.fd_ = -1; }
  ~input_file() {
    if (fd_ >= 0) ::close(fd_);
  }

  status open(const std::string& path) {
    path_ = path;
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) return detail::io_error("cannot open", path);
    struct stat sb {};
    if (::fstat(fd_, &sb) != 0) return detail::io_error("cannot stat", path);
    size_ = std::uint64_t(sb.st_size);
    return status::success();
  }

  status read(std::uint64_t offset, void* out, std::size_t n) const {
    if (offset > size_ || n > size_ - offset)
      return status::invalid(path_ + ": truncated: reading " + std::to_string(n) + " bytes at offset " +
                             std::to_string(offset) + " but the file has " + std::to_string(size_) + " bytes");
    auto* p = static_cast<char*>(out);
    while (n > 0) {
      const ::ssize_t r = ::pread(fd_, p, n, ::off_t(offset));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return detail::io_error("cannot read", path_);
      p += r;
      n -= std::size_t(r);
      offset += std::uint64_t(r);
    }
    return status::success();
  }

  // CRC-32 of the whole file, read in 4 MiB pieces.
  status checksum(std::uint32_t& out) const {
    crc32 c;
    std::vector<char> buf(std::size_t(4) << 20);
    for (std::uint64_t off = 0; off < size_;) {
      const std::size_t n = std::size_t(std::min<std::uint64_t>(buf.size(), size_ - off));
      const status st = read(off, buf.data(), n);
      if (!st.ok()) return st;
      c.update(buf.data(), n);
      off += n;
    }
    out = c.value();
    return status::success();
  }

  const std::string& path() const noexcept { return path_; }
  std::uint64_t size() const noexcept { return size_; }

 private:
  std::string path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
};

// Reads a whole (small) file: index.json.
inline status read_text_file(const std::string& path, std::string& out, std::uint64_t max_bytes = 256u << 20) {
  input_file f;
  status st = f.open(path);
  if (!st.ok()) return st;
  if (f.size() > max_bytes)
    return status::invalid(path + ": " + std::to_string(f.size()) + " bytes, more than the " +
                           std::to_string(max_bytes) + " expected of it");
  out.resize(std::size_t(f.size()));
  return f.read(0, out.data(), out.size());
}

// ---------------------------------------------------------------------------------------------------------------
// safetensors.

struct tensor_info {
  std::string name;
  std::string dtype;  // safetensors name: "F32", "BF16", ...
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0, end = 0;  // byte offsets relative to the data section
  std::uint64_t elements() const {
    std::uint64_t n = 1;
    for (std::uint64_t s : shape) n *= s;
    return n;
  }
};

struct safetensors_header {
  std::vector<tensor_info> tensors;  // in header order
  std::map<std::string, std::string> metadata;
  std::uint64_t data_start = 0;  // 8 + N

  const tensor_info* find(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.name == name) return &t;
    return nullptr;
  }
};

// Largest header accepted (the reference implementation's limit is 100 MB).
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

namespace detail {

inline bool to_u64(const json::value& v, std::uint64_t& out) {
  if (!v.is_number() || v.text.empty() || v.text[0] == '-') return false;
  for (char c : v.text)
    if (c < '0' || c > '9') return false;
  errno = 0;
  char* end = nullptr;
  const unsigned long long x = std::strtoull(v.text.c_str(), &end, 10);
  if (errno != 0 || *end != '\0') return false;
  out = std::uint64_t(x);
  return true;
}

}  // namespace detail

// Reads and validates the header of `f`: the length, the JSON, every entry's dtype, shape and offsets (each tensor
// `elements · dtype size` bytes, the tensors tiling the data section exactly, which also catches a truncated file).
inline status read_header(const input_file& f, safetensors_header& out) {
  out = safetensors_header{};
  const std::string& path = f.path();
  if (f.size() < 8)
    return status::invalid(path + ": truncated: " + std::to_string(f.size()) +
                           " bytes, shorter than the 8-byte safetensors header length");
  unsigned char len_bytes[8];
  status st = f.read(0, len_bytes, 8);
  if (!st.ok()) return st;
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n > max_header_bytes || n > f.size() - 8)
    return status::invalid(path + ": truncated or not a safetensors file: header length " + std::to_string(n) +
                           " but the file has " + std::to_string(f.size()) + " bytes");
  std::string text(std::size_t(n), '\0');
  st = f.read(8, text.data(), text.size());
  if (!st.ok()) return st;
  json::value root;
  st = json::parse(text, root);
  if (!st.ok()) return status::invalid(path + ": safetensors header: " + st.message);
  if (!root.is_object()) return status::invalid(path + ": safetensors header is not a JSON object");
  out.data_start = 8 + n;
  const std::uint64_t data_bytes = f.size() - out.data_start;
  for (const auto& m : root.members) {
    const std::string where = path + ": tensor " + json::quote(m.first) + ": ";
    if (m.first == "__metadata__") {
      if (!m.second.is_object()) return status::invalid(path + ": __metadata__ is not an object");
      for (const auto& kv : m.second.members) {
        if (!kv.second.is_string())
          return status::invalid(path + ": __metadata__ value of " + json::quote(kv.first) + " is not a string");
        out.metadata[kv.first] = kv.second.text;
      }
      continue;
    }
    if (!m.second.is_object()) return status::invalid(where + "entry is not an object");
    tensor_info t;
    t.name = m.first;
    const json::value* dt = m.second.find("dtype");
    const json::value* shape = m.second.find("shape");
    const json::value* offs = m.second.find("data_offsets");
    if (dt == nullptr || !dt->is_string()) return status::invalid(where + "missing string \"dtype\"");
    t.dtype = dt->text;
    const std::size_t esize = safetensors_dtype_size(t.dtype);
    if (esize == 0) return status::invalid(where + "unknown dtype " + json::quote(t.dtype));
    if (shape == nullptr || !shape->is_array()) return status::invalid(where + "missing array \"shape\"");
    for (const auto& s : shape->items) {
      std::uint64_t d = 0;
      if (!detail::to_u64(s, d)) return status::invalid(where + "shape entries must be non-negative integers");
      t.shape.push_back(d);
    }
    if (offs == nullptr || !offs->is_array() || offs->items.size() != 2 || !detail::to_u64(offs->items[0], t.begin) ||
        !detail::to_u64(offs->items[1], t.end) || t.begin > t.end)
      return status::invalid(where + "\"data_offsets\" must be [begin, end] with begin <= end");
    if (t.end - t.begin != t.elements() * esize)
      return status::invalid(where + "data_offsets span " + std::to_string(t.end - t.begin) + " bytes but " + t.dtype +
                             " shape holds " + std::to_string(t.elements() * esize));
    out.tensors.push_back(std::move(t));
  }
  // The tensors must tile [0, data_bytes): sorted by offset, each starting where the previous ended.
  std::vector<const tensor_info*> order;
  for (const auto& t : out.tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const tensor_info* a, const tensor_info* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  std::uint64_t at = 0;
  for (const tensor_info* t : order) {
    if (t->begin != at)
      return status::invalid(path + ": tensor " + json::quote(t->name) + " starts at data byte " +
                             std::to_string(t->begin) + ", expected " + std::to_string(at) +
                             " (tensors must tile the data section)");
    at = t->end;
  }
  if (at != data_bytes)
    return status::invalid(path + ": truncated: the header describes " + std::to_string(at) +
                           " data bytes but the file holds " + std::to_string(data_bytes));
  return status::success();
}

// A tensor to write: `data` holds `elements(shape) · size(dtype)` bytes, or is null when the caller streams the
// bytes itself (safetensors_writer::write).
struct tensor_entry {
  std::string name;
  std::string dtype;
  std::vector<std::uint64_t> shape;
  const void* data = nullptr;
};

// A 1-D entry of n elements of T (float, half_t, bf16_t or double) at `data`, in T's dtype.
template <class T>
tensor_entry tensor_of(std::string name, std::uint64_t n, const T* data) {
  return {std::move(name), safetensors_dtype(dtype_of<T>::value), {n}, data};
}

// Writes one safetensors file crash-safely: begin() writes the header, write() the tensors' bytes in entry order,
// finish() checks the count and commits (fsync + rename).
class safetensors_writer {
 public:
  status begin(const std::string& path, const std::vector<tensor_entry>& entries,
               const std::map<std::string, std::string>& metadata) {
    std::string h = "{";
    bool first = true;
    if (!metadata.empty()) {
      h += "\"__metadata__\":{";
      for (const auto& kv : metadata) {
        if (!first) h += ",";
        first = false;
        h += json::quote(kv.first) + ":" + json::quote(kv.second);
      }
      h += "}";
      first = false;
    }
    expected_ = 0;
    for (const tensor_entry& e : entries) {
      const std::size_t esize = safetensors_dtype_size(e.dtype);
      if (esize == 0) return status::invalid("safetensors: tensor " + e.name + ": unknown dtype " + e.dtype);
      if (e.name == "__metadata__") return status::invalid("safetensors: \"__metadata__\" is not a tensor name");
      std::uint64_t n = esize;
      std::string shape;
      for (std::uint64_t s : e.shape) {
        n *= s;
        shape += (shape.empty() ? "" : ",") + std::to_string(s);
      }
      if (!first) h += ",";
      first = false;
      h += json::quote(e.name) + ":{\"dtype\":" + json::quote(e.dtype) + ",\"shape\":[" + shape +
           "],\"data_offsets\":[" + std::to_string(expected_) + "," + std::to_string(expected_ + n) + "]}";
      expected_ += n;
    }
    h += "}";
    while (h.size() % 8 != 0) h += ' ';  // as the reference writer: the data section starts 8-byte aligned
    status st = file_.open(path);
    if (!st.ok()) return st;
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(std::uint64_t(h.size()) >> (8 * i));
    st = file_.write(len, 8);
    if (st.ok()) st = file_.write(h.data(), h.size());
    data_start_ = file_.bytes();
    return st;
  }
  status write(const void* data, std::size_t n) { return file_.write(data, n); }
  status finish() {
    const std::uint64_t written = file_.bytes() - data_start_;
    if (written != expected_)
      return status::invalid("safetensors: wrote " + std::to_string(written) + " data bytes, the header says " +
                             std::to_string(expected_));
    return file_.commit();
  }
  std::uint64_t bytes() const noexcept { return file_.bytes(); }
  std::uint32_t crc() const noexcept { return file_.crc(); }

 private:
  atomic_file file_;
  std::uint64_t expected_ = 0, data_start_ = 0;
};

// Writes entries whose data the caller holds in memory. `bytes` and `crc` (optional) receive the file's size and
// CRC-32.
inline status write_file(const std::string& path, const std::vector<tensor_entry>& entries,
                         const std::map<std::string, std::string>& metadata, std::uint64_t* bytes = nullptr,
                         std::uint32_t* crc = nullptr) {
  safetensors_writer w;
  status st = w.begin(path, entries, metadata);
  for (const tensor_entry& e : entries) {
    if (!st.ok()) return st;
    std::uint64_t n = safetensors_dtype_size(e.dtype);
    for (std::uint64_t s : e.shape) n *= s;
    if (n > 0 && e.data == nullptr) return status::invalid("safetensors: tensor " + e.name + " has no data");
    if (n > 0) st = w.write(e.data, std::size_t(n));
  }
  if (st.ok()) st = w.finish();
  if (st.ok() && bytes != nullptr) *bytes = w.bytes();
  if (st.ok() && crc != nullptr) *crc = w.crc();
  return st;
}

}  // namespace mpopt::checkpoint

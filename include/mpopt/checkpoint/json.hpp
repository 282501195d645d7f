// The little JSON the checkpoint format needs (safetensors headers, index.json): a value tree, a strict parser
// whose errors give the byte offset, and string quoting. Written here rather than taken from nlohmann-json so the
// header-only library and the consolidation tool need nothing beyond the standard library. Numbers keep their
// text: integers and doubles are converted by the caller, exactly (strtoull / strtod).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "../error.hpp"

namespace mpopt::checkpoint::json {

struct value {
  enum class kind : std::uint8_t { null, boolean, number, string, array, object };
  kind k = kind::null;
  bool b = false;
  std::string text;  // a number's literal or a string's (unescaped) contents
  std::vector<value> items;
  std::vector<std::pair<std::string, value>> members;  // in file order

  bool is_object() const noexcept { return k == kind::object; }
  bool is_array() const noexcept { return k == kind::array; }
  bool is_string() const noexcept { return k == kind::string; }
  bool is_number() const noexcept { return k == kind::number; }
  const value* find(const std::string& key) const {
    for (const auto& m : members)
      if (m.first == key) return &m.second;
    return nullptr;
  }
};

// "\"...\"" with the escapes JSON requires.
inline std::string quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", unsigned(static_cast<unsigned char>(c)));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

namespace detail {

class parser {
 public:
  explicit parser(const std::string& s) : s_(s) {}

  status parse(value& out) {
    status st = parse_value(out, 0);
    if (!st.ok()) return st;
    skip_ws();
    if (pos_ != s_.size()) return fail("trailing characters after the JSON value");
    return status::success();
  }

 private:
  static constexpr int max_depth = 64;

  status fail(const std::string& what) const {
    return status::invalid("invalid JSON at byte " + std::to_string(pos_) + ": " + what);
  }
  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }
  bool eat(char c) {
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool literal(const char* word) {
    std::size_t n = 0;
    while (word[n] != '\0') ++n;
    if (s_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }

  status parse_value(value& v, int depth) {
    if (depth > max_depth) return fail("nested deeper than " + std::to_string(max_depth));
    skip_ws();
    if (pos_ >= s_.size()) return fail("unexpected end of input");
    const char c = s_[pos_];
    if (c == '{') return parse_object(v, depth);
    if (c == '[') return parse_array(v, depth);
    if (c == '"') {
      v.k = value::kind::string;
      return parse_string(v.text);
    }
    if (literal("true")) {
      v.k = value::kind::boolean;
      v.b = true;
      return status::success();
    }
    if (literal("false")) {
      v.k = value::kind::boolean;
      return status::success();
    }
    if (literal("null")) return status::success();
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number(v);
    return fail(std::string("unexpected character '") + c + "'");
  }

  status parse_object(value& v, int depth) {
    v.k = value::kind::object;
    ++pos_;
    if (eat('}')) return status::success();
    for (;;) {
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != '"') return fail("expected a string key");
      std::string key;
      status st = parse_string(key);
      if (!st.ok()) return st;
      if (v.find(key) != nullptr) return fail("duplicate key " + quote(key));
      if (!eat(':')) return fail("expected ':' after key " + quote(key));
      value item;
      st = parse_value(item, depth + 1);
      if (!st.ok()) return st;
      v.members.emplace_back(std::move(key), std::move(item));
      if (eat('}')) return status::success();
      if (!eat(',')) return fail("expected ',' or '}' in an object");
    }
  }

  status parse_array(value& v, int depth) {
    v.k = value::kind::array;
    ++pos_;
    if (eat(']')) return status::success();
    for (;;) {
      value item;
      status st = parse_value(item, depth + 1);
      if (!st.ok()) return st;
      v.items.push_back(std::move(item));
      if (eat(']')) return status::success();
      if (!eat(',')) return fail("expected ',' or ']' in an array");
    }
  }

  status parse_number(value& v) {
    const std::size_t start = pos_;
    auto digits = [&] {
      const std::size_t d = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      return pos_ > d;
    };
    if (s_[pos_] == '-') ++pos_;
    if (!digits()) return fail("malformed number");
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      if (!digits()) return fail("malformed number");
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (!digits()) return fail("malformed number");
    }
    v.k = value::kind::number;
    v.text = s_.substr(start, pos_ - start);
    return status::success();
  }

  static void append_utf8(std::string& out, std::uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  bool hex4(std::uint32_t& cp) {
    if (pos_ + 4 > s_.size()) return false;
    cp = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_++];
      cp <<= 4;
      if (c >= '0' && c <= '9')
        cp |= std::uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f')
        cp |= std::uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F')
        cp |= std::uint32_t(c - 'A' + 10);
      else
        return false;
    }
    return true;
  }

  status parse_string(std::string& out) {
    ++pos_;  // the opening quote
    for (;;) {
      if (pos_ >= s_.size()) return fail("unterminated string");
      const char c = s_[pos_++];
      if (c == '"') return status::success();
      if (static_cast<unsigned char>(c) < 0x20) return fail("control character in a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) return fail("unterminated escape");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          std::uint32_t cp = 0;
          if (!hex4(cp)) return fail("malformed \\u escape");
          if (cp >= 0xD800 && cp < 0xDC00) {  // a surrogate pair
            std::uint32_t lo = 0;
            if (!(pos_ + 2 <= s_.size() && s_[pos_] == '\\' && s_[pos_ + 1] == 'u')) return fail("lone surrogate");
            pos_ += 2;
            if (!hex4(lo) || lo < 0xDC00 || lo >= 0xE000) return fail("malformed surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: return fail(std::string("unknown escape '\\") + e + "'");
      }
    }
  }

  const std::string& s_;
  std::size_t pos_ = 0;
};

}  // namespace detail

// Parses all of `text`; on failure the message gives the byte offset and the problem.
inline status parse(const std::string& text, value& out) {
  out = value{};
  return detail::parser(text).parse(out);
}

}  // namespace mpopt::checkpoint::json

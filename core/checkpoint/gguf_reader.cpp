// SPDX-License-Identifier: Apache-2.0
/// \file gguf_reader.cpp
/// \brief GGUF parsing with every read bounded by the file (Note [GGUF checks]).
#include "core/checkpoint/gguf_reader.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "core/checkpoint/safetensors_reader.h"
#include "core/error.h"

namespace tidal::core {

namespace {

// ggml.h enum ggml_type with the block layouts of ggml's type traits.
constexpr GgmlTypeInfo kTypes[] = {
    {0, "F32", 1, 4},         {1, "F16", 1, 2},         {2, "Q4_0", 32, 18},
    {3, "Q4_1", 32, 20},      {6, "Q5_0", 32, 22},      {7, "Q5_1", 32, 24},
    {8, "Q8_0", 32, 34},      {9, "Q8_1", 32, 40},      {10, "Q2_K", 256, 84},
    {11, "Q3_K", 256, 110},   {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},   {15, "Q8_K", 256, 292},   {16, "IQ2_XXS", 256, 66},
    {17, "IQ2_XS", 256, 74},  {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},
    {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110},  {22, "IQ2_S", 256, 82},
    {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},         {25, "I16", 1, 2},
    {26, "I32", 1, 4},        {27, "I64", 1, 8},        {28, "F64", 1, 8},
    {29, "IQ1_M", 256, 56},   {30, "BF16", 1, 2},       {34, "TQ1_0", 256, 54},
    {35, "TQ2_0", 256, 66},   {39, "MXFP4", 32, 17},
};

// Note [GGUF checks]
// A GGUF file declares counts (tensors, keys, array elements), lengths (strings) and sizes
// (dimensions) that a damaged or hostile file can set to anything. The reader never trusts one
// before bounding it by what is left of the file: a count of N items, each at least k bytes, needs
// N * k bytes to remain; a string's length must fit in the remaining bytes; shapes must multiply to
// a byte size without overflow and lie, aligned, inside the data section. Arrays of arrays are
// refused (llama.cpp does not write them), so nesting is one level deep. Nothing is allocated from
// a declared size before that check, so a 1 KB file claiming 2^60 tensors fails at once.
constexpr uint64_t kMaxDims = 4;
// Keys and tensor names: llama.cpp writes tensor names under 64 bytes; accept longer ones (and long
// keys), but bounded.
constexpr uint64_t kMaxNameBytes = 1 << 16;
// Metadata values held in memory (array elements count one each): a file byte can become ~16 bytes
// of JSON (a u8 array), so the total is capped rather than only bounded by the file. Real files
// hold a few hundred thousand (the tokenizer's tokens and merges).
constexpr uint64_t kMaxMetadataValues = uint64_t{1} << 24;

class Cursor {
 public:
  Cursor(const std::byte* data, size_t size, const std::string& file)
      : p_(data), size_(size), file_(file) {}
  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }

  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const char* what,
                          uint64_t max_len = std::numeric_limits<uint64_t>::max()) {
    const auto n = read<uint64_t>(what);
    TIDAL_CHECK(n <= left() && n <= max_len, FormatError,
                "GGUF file \"{}\": {} at byte {} has length {} (only {} bytes left in the file)",
                file_, what, pos_ - 8, n, left());
    std::string s(reinterpret_cast<const char*>(p_ + pos_), static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return s;
  }
  /// `count` items of at least `min_bytes` each must fit in what is left.
  void check_count(uint64_t count, uint64_t min_bytes, const char* what) const {
    TIDAL_CHECK(min_bytes == 0 || count <= left() / min_bytes, FormatError,
                "GGUF file \"{}\": {} = {} cannot fit in the {} bytes left of the file", file_,
                what, count, left());
  }

 private:
  void need(size_t n, const char* what) const {
    TIDAL_CHECK(n <= left(), FormatError,
                "GGUF file \"{}\" is truncated: {} at byte {} needs {} bytes, {} left", file_, what,
                pos_, n, left());
  }
  const std::byte* p_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& file_;
};

uint64_t scalar_size(GgufValueType t) {
  switch (t) {
    case GgufValueType::kU8:
    case GgufValueType::kI8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kU16:
    case GgufValueType::kI16:
      return 2;
    case GgufValueType::kU32:
    case GgufValueType::kI32:
    case GgufValueType::kF32:
      return 4;
    case GgufValueType::kU64:
    case GgufValueType::kI64:
    case GgufValueType::kF64:
      return 8;
    case GgufValueType::kString:
      return 8;  // the length prefix, at least
    case GgufValueType::kArray:
      return 12;  // element type + count, at least
  }
  return 0;
}

// Keys and tensor names are names: they must be well-formed UTF-8 (RFC 3629: no overlong forms,
// no surrogates, nothing above U+10FFFF). String values may hold any bytes.
bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c < 0x80) {
      n = 0;
    } else if (c >= 0xC2 && c <= 0xDF) {
      n = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 2;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return false;
    }
    if (n > 0 && i + n >= s.size()) return false;
    for (size_t k = 1; k <= n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if (k == 1 ? (b < lo || b > hi) : (b >> 6) != 0x2) return false;
    }
    i += n + 1;
  }
  return true;
}

bool known_value_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufValueType::kF64); }

nlohmann::json read_scalar(Cursor& c, GgufValueType t, const std::string& key,
                           const std::string& file) {
  switch (t) {
    case GgufValueType::kU8:
      return c.read<uint8_t>("a u8 value");
    case GgufValueType::kI8:
      return c.read<int8_t>("an i8 value");
    case GgufValueType::kU16:
      return c.read<uint16_t>("a u16 value");
    case GgufValueType::kI16:
      return c.read<int16_t>("an i16 value");
    case GgufValueType::kU32:
      return c.read<uint32_t>("a u32 value");
    case GgufValueType::kI32:
      return c.read<int32_t>("an i32 value");
    case GgufValueType::kF32:
      return c.read<float>("an f32 value");
    case GgufValueType::kBool: {
      const auto b = c.read<uint8_t>("a bool value");
      TIDAL_CHECK(b <= 1, FormatError, "GGUF file \"{}\": key \"{}\" holds bool byte {}", file, key,
                  b);
      return b == 1;
    }
    case GgufValueType::kString: {
      // Bytes that are not UTF-8 are kept; dump with error_handler_t::replace to print them.
      return c.read_string("a string value");
    }
    case GgufValueType::kU64:
      return c.read<uint64_t>("a u64 value");
    case GgufValueType::kI64:
      return c.read<int64_t>("an i64 value");
    case GgufValueType::kF64:
      return c.read<double>("an f64 value");
    case GgufValueType::kArray:
      break;
  }
  throw FormatError(fmt::format("GGUF file \"{}\": key \"{}\": bad value type", file, key));
}

}  // namespace

const GgmlTypeInfo* ggml_type_info(uint32_t id) {
  for (const auto& t : kTypes)
    if (t.id == id) return &t;
  return nullptr;
}

GgufFile::GgufFile(const std::filesystem::path& path) : name_(path.filename().string()) {
  TIDAL_CHECK(std::filesystem::exists(path), FileNotFound, "GGUF file \"{}\" does not exist",
              path.string());
  TIDAL_CHECK(!std::filesystem::is_directory(path), InvalidArgument,
              "\"{}\" is a directory, not a GGUF file", path.string());
  map_ = std::make_unique<MappedFile>(path);
  parse_checked(map_->data(), map_->size());
}

GgufFile::GgufFile(const std::byte* data, size_t size, std::string name) : name_(std::move(name)) {
  parse_checked(data, size);
}

void GgufFile::parse_checked(const std::byte* data, size_t size) {
  // The checks bound every size by the file; these turn what is left (memory for the metadata of a
  // very large file, a JSON library error) into the same clear error.
  try {
    parse(data, size);
  } catch (const std::bad_alloc&) {
    throw FormatError(fmt::format("GGUF file \"{}\": its metadata does not fit in memory", name_));
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("GGUF file \"{}\": bad metadata: {}", name_, e.what()));
  }
}

GgufFile::~GgufFile() = default;

const GgufTensor* GgufFile::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

void GgufFile::parse(const std::byte* data, size_t size) {
  Cursor c(data, size, name_);
  TIDAL_CHECK(size >= 4 && std::memcmp(data, "GGUF", 4) == 0, FormatError,
              "\"{}\" is not a GGUF file (it does not start with the magic \"GGUF\")", name_);
  c.read<uint32_t>("the magic");
  version_ = c.read<uint32_t>("the version");
  TIDAL_CHECK(version_ == 2 || version_ == 3, FormatError,
              "GGUF file \"{}\" has version {}; tidal reads versions 2 and 3", name_, version_);
  const auto n_tensors = c.read<uint64_t>("the tensor count");
  const auto n_kv = c.read<uint64_t>("the metadata count");
  // Smallest entries: a key's length prefix + type + 1-byte value; a tensor info of an empty name,
  // one dimension, type and offset.
  c.check_count(n_kv, 8 + 4 + 1, "the metadata count");
  c.check_count(n_tensors, 8 + 4 + 8 + 4 + 8, "the tensor count");

  uint64_t values = 0;
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = c.read_string("a metadata key", kMaxNameBytes);
    TIDAL_CHECK(!key.empty(), FormatError, "GGUF file \"{}\": metadata key {} is empty", name_, i);
    TIDAL_CHECK(valid_utf8(key), FormatError, "GGUF file \"{}\": metadata key {} is not UTF-8",
                name_, i);
    TIDAL_CHECK(!types_.count(key), FormatError,
                "GGUF file \"{}\": metadata key \"{}\" appears twice", name_, key);
    const auto t = c.read<uint32_t>("a metadata type");
    TIDAL_CHECK(known_value_type(t), FormatError,
                "GGUF file \"{}\": metadata key \"{}\" has unknown value type {}", name_, key, t);
    const auto vt = static_cast<GgufValueType>(t);
    types_[key] = vt;
    if (vt != GgufValueType::kArray) {
      metadata_[key] = read_scalar(c, vt, key, name_);
      continue;
    }
    const auto et = c.read<uint32_t>("an array element type");
    TIDAL_CHECK(known_value_type(et) && et != static_cast<uint32_t>(GgufValueType::kArray),
                FormatError,
                "GGUF file \"{}\": array \"{}\" has element type {} (arrays of scalars or "
                "strings only)",
                name_, key, et);
    const auto n = c.read<uint64_t>("an array length");
    const auto elem = static_cast<GgufValueType>(et);
    c.check_count(n, scalar_size(elem), "an array length");
    values += n;
    TIDAL_CHECK(values <= kMaxMetadataValues, FormatError,
                "GGUF file \"{}\": the metadata holds more than {} values (array \"{}\" has {})",
                name_, kMaxMetadataValues, key, n);
    array_types_[key] = elem;
    nlohmann::json arr = nlohmann::json::array();
    arr.get_ref<nlohmann::json::array_t&>().reserve(static_cast<size_t>(n));
    for (uint64_t j = 0; j < n; ++j) arr.push_back(read_scalar(c, elem, key, name_));
    metadata_[key] = std::move(arr);
  }
  if (types_.count("general.alignment")) {
    const auto& a = metadata_.at("general.alignment");
    const bool u32 = types_.at("general.alignment") == GgufValueType::kU32;
    const uint64_t v = u32 ? a.get<uint64_t>() : 0;
    TIDAL_CHECK(u32 && v > 0 && (v & (v - 1)) == 0, FormatError,
                "GGUF file \"{}\": general.alignment must be a u32 power of two, got {}", name_,
                u32 ? std::to_string(v) : std::string("a value of another type"));
    alignment_ = v;
  }
  // Counted again against what is left after the metadata, before reserving.
  c.check_count(n_tensors, 8 + 4 + 8 + 4 + 8, "the tensor count");
  tensors_.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensor t;
    t.name = c.read_string("a tensor name", kMaxNameBytes);
    TIDAL_CHECK(valid_utf8(t.name), FormatError,
                "GGUF file \"{}\": the name of tensor {} is not UTF-8", name_, i);
    TIDAL_CHECK(!index_.count(t.name), FormatError, "GGUF file \"{}\": tensor \"{}\" appears twice",
                name_, t.name);
    const auto n_dims = c.read<uint32_t>("a tensor's dimension count");
    TIDAL_CHECK(n_dims >= 1 && n_dims <= kMaxDims, FormatError,
                "GGUF file \"{}\": tensor \"{}\" has {} dimensions (1 to {})", name_, t.name,
                n_dims, kMaxDims);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const auto ne = c.read<int64_t>("a tensor dimension");
      TIDAL_CHECK(
          ne > 0 && static_cast<uint64_t>(ne) <= std::numeric_limits<uint64_t>::max() / numel,
          FormatError, "GGUF file \"{}\": tensor \"{}\" has dimension {} = {}", name_, t.name, d,
          ne);
      numel *= static_cast<uint64_t>(ne);
      t.ne.push_back(ne);
    }
    t.type = c.read<uint32_t>("a tensor type");
    const GgmlTypeInfo* ti = ggml_type_info(t.type);
    TIDAL_CHECK(ti != nullptr, FormatError,
                "GGUF file \"{}\": tensor \"{}\" has ggml type {}, which tidal does not know",
                name_, t.name, t.type);
    TIDAL_CHECK(t.ne[0] % ti->block == 0, FormatError,
                "GGUF file \"{}\": tensor \"{}\" ({}) has rows of {} values, not a multiple of the "
                "{}-value block",
                name_, t.name, ti->name, t.ne[0], ti->block);
    const uint64_t blocks = numel / static_cast<uint64_t>(ti->block);
    TIDAL_CHECK(blocks <= std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(ti->bytes),
                FormatError, "GGUF file \"{}\": tensor \"{}\" is too large", name_, t.name);
    t.nbytes = blocks * static_cast<uint64_t>(ti->bytes);
    t.offset = c.read<uint64_t>("a tensor offset");
    TIDAL_CHECK(t.offset % alignment_ == 0, FormatError,
                "GGUF file \"{}\": tensor \"{}\" starts at offset {}, not a multiple of the "
                "alignment {}",
                name_, t.name, t.offset, alignment_);
    index_[t.name] = tensors_.size();
    tensors_.push_back(std::move(t));
  }
  // The data section starts at the next multiple of the alignment.
  const uint64_t pos = c.pos();
  data_offset_ = (pos + alignment_ - 1) / alignment_ * alignment_;
  TIDAL_CHECK(data_offset_ <= size, FormatError,
              "GGUF file \"{}\" is truncated: its data section would start at byte {} of {}", name_,
              data_offset_, size);
  const uint64_t data_bytes = size - data_offset_;
  for (auto& t : tensors_) {
    TIDAL_CHECK(
        t.offset <= data_bytes && t.nbytes <= data_bytes - t.offset, FormatError,
        "GGUF file \"{}\" is truncated: tensor \"{}\" ({} bytes at data offset {}) ends past "
        "the end of the file ({} data bytes)",
        name_, t.name, t.nbytes, t.offset, data_bytes);
    t.data = data + data_offset_ + t.offset;
  }
}

}  // namespace tidal::core

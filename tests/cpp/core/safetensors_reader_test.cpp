// SPDX-License-Identifier: Apache-2.0
/// \file safetensors_reader_test.cpp
/// \brief safetensors reading: values, sharded index, and every malformed-file error.
#include "core/checkpoint/safetensors_reader.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace tidal::core {
namespace {
namespace fs = std::filesystem;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("tidal_st_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  static void write(const fs::path& p, const std::string& header, const std::string& data) {
    std::ofstream f(p, std::ios::binary);
    const uint64_t n = header.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << header << data;
  }
  fs::path dir_;
};

TEST_F(SafetensorsTest, ReadsValuesAndShards) {
  const float vals[3] = {1.5f, -2.f, 3.25f};
  write(dir_ / "a.safetensors",
        R"({"__metadata__":{"format":"pt"},"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})",
        std::string(reinterpret_cast<const char*>(vals), 12));
  write(dir_ / "b.safetensors", R"({"y":{"dtype":"BF16","shape":[1,2],"data_offsets":[0,4]}})",
        std::string(4, '\0'));
  std::ofstream(dir_ / "model.safetensors.index.json")
      << R"({"metadata":{},"weight_map":{"x":"a.safetensors","y":"b.safetensors"}})";
  auto ck = Checkpoint::open(dir_);
  const auto* x = ck->find("x");
  ASSERT_NE(x, nullptr);
  EXPECT_EQ(x->dtype, kernels::DType::kF32);
  EXPECT_EQ(x->shape, (std::vector<int64_t>{3}));
  EXPECT_EQ(reinterpret_cast<const float*>(x->data)[2], 3.25f);
  ASSERT_NE(ck->find("y"), nullptr);
  EXPECT_EQ(ck->find("y")->file, "b.safetensors");
  EXPECT_EQ(ck->find("z"), nullptr);
  EXPECT_EQ(ck->names(), (std::vector<std::string>{"x", "y"}));
}

TEST_F(SafetensorsTest, MalformedFilesAreFormatErrors) {
  auto expect_format_error = [&](const std::string& header, const std::string& data,
                                 const std::string& needle) {
    write(dir_ / "model.safetensors", header, data);
    try {
      Checkpoint::open(dir_);
      FAIL() << "expected FormatError for " << header;
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("model.safetensors"), std::string::npos) << e.what();
    }
  };
  expect_format_error(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                      std::string(8, '\0'), "truncated");
  expect_format_error(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})",
                      std::string(8, '\0'), "\"x\"");
  expect_format_error(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0)", "", "corrupt header");
  expect_format_error(R"({"x":{"dtype":"F32","shape":[2]}})", std::string(8, '\0'), "\"x\"");
  expect_format_error(R"([1,2])", "", "not a JSON object");
  // Header length beyond the file.
  {
    std::ofstream f(dir_ / "model.safetensors", std::ios::binary);
    const uint64_t n = 1ull << 40;
    f.write(reinterpret_cast<const char*>(&n), 8);
  }
  EXPECT_THROW(Checkpoint::open(dir_), FormatError);
  // Too short for a header.
  std::ofstream(dir_ / "model.safetensors", std::ios::binary) << "abc";
  EXPECT_THROW(Checkpoint::open(dir_), FormatError);
}

TEST_F(SafetensorsTest, MissingThings) {
  EXPECT_THROW(Checkpoint::open(dir_ / "nope"), FileNotFound);
  EXPECT_THROW(Checkpoint::open(dir_), FileNotFound);  // empty directory
  std::ofstream(dir_ / "model.safetensors.index.json")
      << R"({"weight_map":{"x":"missing.safetensors"}})";
  EXPECT_THROW(Checkpoint::open(dir_), FileNotFound);
  std::ofstream(dir_ / "model.safetensors.index.json")
      << R"({"weight_map":{"x":"../evil.safetensors"}})";
  EXPECT_THROW(Checkpoint::open(dir_), FormatError);
}

}  // namespace
}  // namespace tidal::core

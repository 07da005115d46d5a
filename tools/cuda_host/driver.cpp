// Driver of the host harness: runs registered extern "C" launchers on buffers read from files.
//
//   driver CALL_FILE...
//
// A call file is text, one item per line:
//   call NAME
//   ptr BYTES OFFSET IN OUT   a fresh allocation of exactly BYTES bytes (so AddressSanitizer sees one
//                             past its end), filled from file IN ('-': 0xFF bytes), passed as its
//                             address + OFFSET bytes, written to file OUT after the call ('-': not)
//   alias ARG OFFSET          the allocation of earlier argument ARG (0-based), + OFFSET bytes
//   null                      a null pointer (also the stream)
//   int VALUE                 an integer argument (range-checked against the parameter type)
//   float VALUE               a floating-point argument (strtod: decimal or C99 hex)
// The driver prints "rc NAME VALUE" (the launcher's return value) per call file.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_host.h"

namespace {

struct Buffer {
  unsigned char* data = nullptr;
  std::size_t bytes = 0;
  std::string out;
};

std::vector<unsigned char> read_file(const std::string& path, std::size_t bytes) {
  std::ifstream f(path, std::ios::binary);
  if (!f) cuda_host::die("cannot read %s", path.c_str());
  std::vector<unsigned char> v(bytes);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(bytes));
  if (static_cast<std::size_t>(f.gcount()) != bytes) cuda_host::die("%s: expected %zu bytes", path.c_str(), bytes);
  return v;
}

void run_call_file(const char* path) {
  std::ifstream in(path);
  if (!in) cuda_host::die("cannot open %s", path);
  std::string line, name;
  std::vector<cuda_host::Arg> args;
  std::vector<Buffer> bufs;
  std::vector<int> arg_buf;  // index into bufs per argument, -1 if none
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string kind;
    if (!(ls >> kind)) continue;
    cuda_host::Arg a;
    int owner = -1;
    if (kind == "call") {
      ls >> name;
      continue;
    } else if (kind == "ptr") {
      std::size_t bytes = 0, offset = 0;
      std::string src, dst;
      if (!(ls >> bytes >> offset >> src >> dst)) cuda_host::die("%s: bad line '%s'", path, line.c_str());
      Buffer b;
      b.bytes = bytes;
      b.data = static_cast<unsigned char*>(std::malloc(bytes ? bytes : 1));
      if (src == "-")
        std::memset(b.data, 0xFF, bytes);
      else if (bytes)
        std::memcpy(b.data, read_file(src, bytes).data(), bytes);
      b.out = dst == "-" ? "" : dst;
      bufs.push_back(b);
      owner = static_cast<int>(bufs.size()) - 1;
      a.p = b.data + offset;
    } else if (kind == "alias") {
      std::size_t idx = 0, offset = 0;
      if (!(ls >> idx >> offset) || idx >= args.size() || arg_buf[idx] < 0)
        cuda_host::die("%s: bad alias '%s'", path, line.c_str());
      owner = arg_buf[idx];
      a.p = bufs[owner].data + offset;
    } else if (kind == "null") {
      a.p = nullptr;
    } else if (kind == "int") {
      a.kind = cuda_host::Arg::Int;
      if (!(ls >> a.i)) cuda_host::die("%s: bad line '%s'", path, line.c_str());
    } else if (kind == "float") {
      a.kind = cuda_host::Arg::Float;
      std::string v;
      ls >> v;
      char* end = nullptr;
      a.f = std::strtod(v.c_str(), &end);
      if (v.empty() || *end) cuda_host::die("%s: bad float '%s'", path, line.c_str());
    } else {
      cuda_host::die("%s: unknown item '%s'", path, kind.c_str());
    }
    args.push_back(a);
    arg_buf.push_back(owner);
  }
  if (name.empty()) cuda_host::die("%s: no 'call NAME' line", path);
  const long long rc = cuda_host::call_launcher(name.c_str(), args.data(), args.size());
  for (const Buffer& b : bufs) {
    if (!b.out.empty()) {
      std::ofstream f(b.out, std::ios::binary);
      f.write(reinterpret_cast<const char*>(b.data), static_cast<std::streamsize>(b.bytes));
      if (!f) cuda_host::die("cannot write %s", b.out.c_str());
    }
    std::free(b.data);
  }
  std::printf("rc %s %lld\n", name.c_str(), rc);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s CALL_FILE...\n", argv[0]);
    return 2;
  }
  for (int i = 1; i < argc; ++i) run_call_file(argv[i]);
  return 0;
}

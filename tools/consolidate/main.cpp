// mpopt-consolidate CHECKPOINT_DIR OUT.safetensors [--dtype fp32|bf16|fp16|fp64] [--states] [--no-verify]
// Full weights from a sharded mpopt checkpoint, without a distributed runtime (mpopt/checkpoint/consolidate.hpp).
// Exit status: 0 done, 1 the checkpoint could not be read or the output written, 2 bad usage.
#include <mpopt/checkpoint/consolidate.hpp>

#include <cstdio>
#include <cstring>
#include <string>

namespace {

int usage(const char* why) {
  std::fprintf(stderr,
               "mpopt-consolidate: %s\n"
               "usage: mpopt-consolidate CHECKPOINT_DIR OUT.safetensors [--dtype fp32|bf16|fp16|fp64] [--states] "
               "[--no-verify]\n"
               "  writes tensor t of group g as \"group<g>.tensor<t>\" (with --states also "
               "\"group<g>.tensor<t>.<state>\");\n"
               "  the dtype defaults to the checkpoint's master dtype (fp32 for a Kahan master, whose weights,\n"
               "  master + compensation, are written summed)\n",
               why);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string positional[2];
  int npos = 0;
  mpopt::checkpoint::consolidate_options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--dtype") {
      if (i + 1 >= argc) return usage("--dtype needs a value");
      o.dtype = argv[++i];
      mpopt::dtype d{};
      if (!mpopt::checkpoint::parse_dtype(o.dtype, d))
        return usage(("--dtype must be fp32, bf16, fp16 or fp64, got \"" + o.dtype + "\"").c_str());
    } else if (a == "--states") {
      o.states = true;
    } else if (a == "--no-verify") {
      o.verify_checksums = false;
    } else if (a == "-h" || a == "--help") {
      return usage("help");
    } else if (!a.empty() && a[0] == '-') {
      return usage(("unknown option \"" + a + "\"").c_str());
    } else if (npos < 2) {
      positional[npos++] = a;
    } else {
      return usage(("unexpected argument \"" + a + "\"").c_str());
    }
  }
  if (npos != 2) return usage("expected CHECKPOINT_DIR and OUT.safetensors");
  const mpopt::status st = mpopt::checkpoint::consolidate(positional[0], positional[1], o);
  if (!st.ok()) {
    std::fprintf(stderr, "mpopt-consolidate: %s\n", st.message.c_str());
    return 1;
  }
  std::printf("mpopt-consolidate: wrote %s\n", positional[1].c_str());
  return 0;
}

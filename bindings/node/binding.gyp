{
  "variables": {
    "cfqt_include%": "<!(node -p \"process.env.CFQT_INCLUDE_DIR || require('path').resolve('../../include')\")",
    "cfqt_lib%": "<!(node -p \"process.env.CFQT_LIBRARY_DIR || require('path').resolve('../../build/lib')\")"
  },
  "targets": [{
    "target_name": "cfqt",
    "sources": ["src/addon.cc"],
    "include_dirs": ["<!@(node -p \"require('node-addon-api').include\")", "<(cfqt_include)"],
    "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS"],
    "cflags!": ["-fno-exceptions"],
    "cflags_cc!": ["-fno-exceptions"],
    "cflags_cc": ["-std=c++17", "-fexceptions"],
    "libraries": ["-L<(cfqt_lib)", "-lcfqt", "-Wl,-rpath,'$$ORIGIN'"]
  }]
}

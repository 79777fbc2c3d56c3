// Python entry point of exactq._C. The module itself is empty: importing it loads the shared library,
// whose static initialisers register the CPU (and, when built, CUDA) kernels with the dispatcher
// under the schemas that exactq/_ops.py defines.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

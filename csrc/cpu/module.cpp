// Python module `adaptwin._C`. It exports nothing: importing it runs the TORCH_LIBRARY_IMPL blocks of
// the other translation units, which register the kernels with the dispatcher.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "adaptwin native kernels", -1, nullptr};
  return PyModule_Create(&module);
}

// Python module `adaptwin._C`. Importing it runs the TORCH_LIBRARY_IMPL blocks of the other translation
// units, which register the kernels with the dispatcher; its functions are the ops' fast inference entry
// points (python_calls.cpp).
#include <Python.h>

namespace adaptwin {
extern PyMethodDef kPythonMethods[];
}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "adaptwin native kernels", -1,
                                      adaptwin::kPythonMethods};
  return PyModule_Create(&module);
}

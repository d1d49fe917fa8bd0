// Python bindings of the mltrain kernels (module mltrain._C).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mltrain C++ kernels; references in mltrain.ops";
  m.def("pack", &mltrain::pack, "flat[...] = cast(scale * concat(tensors))", py::arg("tensors"),
        py::arg("flat"), py::arg("scale") = 1.0);
  m.def("unpack", &mltrain::unpack, "tensors = cast(scale * split(flat))", py::arg("flat"),
        py::arg("tensors"), py::arg("scale") = 1.0);
  m.def("restrict_depth", &mltrain::restrict_depth, "coarse layers from fine ones",
        py::arg("fine"), py::arg("cf"), py::arg("mode"));
  m.def("prolong_depth", &mltrain::prolong_depth, "fine layers from coarse ones",
        py::arg("coarse"), py::arg("cf"), py::arg("mode"), py::arg("n_fine") = 0);
  m.def("sum_buffers", &mltrain::sum_buffers, "out = sum(bufs)", py::arg("out"), py::arg("bufs"));
  m.def("axpby", &mltrain::axpby, "out = a*x + b*y", py::arg("out"), py::arg("a"), py::arg("x"),
        py::arg("b"), py::arg("y"));
  m.def("residual_sweep", &mltrain::residual_sweep, "a chain of residual steps",
        py::arg("x"), py::arg("weights"), py::arg("biases"), py::arg("h"), py::arg("scale"),
        py::arg("adds"));
  m.def("residual_steps", &mltrain::residual_steps, "residual steps, each from its own state",
        py::arg("xs"), py::arg("weights"), py::arg("biases"), py::arg("h"), py::arg("scale"));
  m.def("residual_masks", &mltrain::residual_masks, "ReLU masks at states", py::arg("xs"),
        py::arg("weights"), py::arg("biases"));
  m.def("residual_vjp_sweep", &mltrain::residual_vjp_sweep,
        "a chain of residual vector-Jacobian products", py::arg("lam"), py::arg("masks"),
        py::arg("weights"), py::arg("h"), py::arg("scale"), py::arg("adds"));
}

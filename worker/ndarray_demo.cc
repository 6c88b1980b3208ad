// ndarray_demo: the NDArray section of the MXNet.jl overview, step by
// step, in C++.
#include <iostream>

#include "ndarray/ndarray.h"

int main() {
  std::cout << "# x = mx.zeros(2, 3)\n" << mx::Zeros({2, 3}) << "\n";

  std::cout << "# z = mx.ones(size(x), mx.gpu())\n";
  try {
    std::cout << mx::Ones({2, 3}, mx::gpu()) << "\n";
  } catch (const mx::Error& e) {
    std::cout << "error: " << e.what() << "\n\n";
  }

  std::cout << "# a = mx.ones(3, 2); b = slice(a, 0:2); b[:] = 2\n";
  mx::NDArray a = mx::Ones({3, 2});
  mx::NDArray b = a.Slice(0, 2);
  b.Assign(2);
  std::cout << a << "\n";

  std::cout << "# mx.srand(42); a[:] = 0.5; a[:] = rand(size(a))\n";
  mx::srand(42);
  a = mx::Empty({2, 3});
  a.Assign(0.5f);
  std::cout << a << "\n";
  a.Assign(mx::RandomUniform(0, 1, a.shape()).ToVector());
  std::cout << a << "\n";

  std::cout << "# b = mx.empty(size(a)); b[:] = a\n";
  b = mx::Empty(a.shape());
  b.Assign(a);
  std::cout << b << "\n";

  std::cout << "# r = a; a = a + b  (rebinding: r keeps the old values)\n";
  a = mx::Ones({2});
  mx::NDArray r = a;
  b = mx::Ones({2});
  a = a + b;
  std::cout << "a = " << a << "r = " << r << "\n";

  std::cout << "# a += b  (truly in place in C++: r sees it)\n";
  a = mx::Ones({2});
  r = a;
  a += b;
  std::cout << "a = " << a << "r = " << r << "\n";

  std::cout << "# SGD update: weight += -lr * (grad_scale * grad + wd * weight)\n";
  mx::NDArray weight = mx::Ones({2, 2}), grad = mx::Full({2, 2}, 0.5f);
  const float lr = 0.1f, grad_scale = 1.0f, wd = 0.01f;
  weight += -lr * (grad_scale * grad + wd * weight);
  std::cout << weight;
  mx::WaitAll();
  return 0;
}

"""jupyter_kernel_test's conformance suite against the installed ``link`` kernelspec.

The samples are the ones ipykernel runs against itself, so Link is held to
what a plain ipykernel answers.
"""

from __future__ import annotations

import jupyter_kernel_test


class LinkKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = "link"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise"
    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
        {"code": "# link: local\n'routed' + '!'", "result": "'routed!'"},
    ]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
         "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
         "mime": "text/latex"},
    ]
    supported_history_operations = ("tail", "range", "search")
    code_history_pattern = "1?2*"
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"


class LinkIopubWelcomeTests(jupyter_kernel_test.IopubWelcomeTests):
    kernel_name = "link"
    support_iopub_welcome = True

"""Command-line front ends. The only place in the package that prints or exits."""

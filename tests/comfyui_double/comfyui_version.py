# The fixture builder rewrites this file for every tagged release of the double.
__version__ = "0.8.0"

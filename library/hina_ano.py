"""Alias for the import path used in the ANLO design document: ``from library.hina_ano import ANLO``."""

from library.hina_anlo import ANLO

__all__ = ["ANLO"]

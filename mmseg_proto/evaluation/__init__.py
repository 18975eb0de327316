from .prototype_health import (format_health_table, nearest_prototype_usage,
                               prototype_health)

__all__ = ['format_health_table', 'nearest_prototype_usage', 'prototype_health']

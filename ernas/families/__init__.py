"""Model families. Importing this package registers each family's FamilySpec."""
from ernas.families import nafnet  # noqa: F401

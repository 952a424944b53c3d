"""The model zoo: train each preset's tiny recipe on ShapesWorld and evaluate every task it
supports, one results.json per preset and one Markdown table (ZOO.md) for all of them."""

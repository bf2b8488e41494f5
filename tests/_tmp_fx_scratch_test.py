def test_fx(merged_model, tiny_base):
    print(merged_model)
    import os; print(os.listdir(merged_model))

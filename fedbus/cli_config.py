from fedbus._placeholder import not_available

app = not_available("config")
